"""diapipe's pipeline definitions, exported as AP_PIPE_DIR (see `diapipe env`)."""
