"""The function side of the wire: what runs inside the client and aggregator Cloud Functions.

`cloud/main.py` adapts functions-framework requests to `client.handle_client` and
`aggregator.handle_aggregator` through `http.as_response`. The modules: `env` (what a function
is configured with), `errors` and `http` (the HTTP boundary), `tokens` (ID-token checks),
`clientdata` (a client's data and payload checks), `client`, `injected` (faults acted out at
the boundary) and `aggregator`. Nothing on the driver side imports this package.
"""
