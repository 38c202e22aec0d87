"""The service: the app, the refresh loop, the exposition, the HTTP server and its web config."""
