"""The kvlayer cache server's wire API: generated gRPC code (``_gen``), the fast frame format
(``wire``) and the typed client (``client``).

It sits below both sides: the server (``kvlayer.server``) implements the API and the ``remote``
storage tier (``kvlayer.storage.remote``) calls it, so neither imports the other. Importing this
package pulls in nothing; ``kvlayer.rpc.client`` needs grpcio (``pip install 'kvlayer[server]'``).
"""
