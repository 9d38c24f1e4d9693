"""The client daemon: polls the server, trains locally with the shared trainer, uploads protected updates."""
