"""The federation server: strategies, selection, the round coordinator and its two drivers."""
