"""The web console: the seed's pages and buttons, served by ``modelctl serve`` or apart by
``modelctl console``. A client of the public gRPC API (through ``api.client``) and nothing
else: it never touches the database, so roles, audit and errors are exactly the API's."""
