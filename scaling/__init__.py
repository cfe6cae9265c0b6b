"""IsoFLOP scaling-law experiments and fits (`herd scaling`, docs/scaling.md)."""
