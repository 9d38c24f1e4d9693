"""What the server and the clients both need: config, data, models, training, privacy, crypto, codecs.

This package never imports ``fl_server`` or ``fl_client``, nor any HTTP library: it is the
transport-free core that both drivers (REST deployment and in-process simulation) run.
"""
