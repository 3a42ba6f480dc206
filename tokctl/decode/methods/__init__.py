"""One module per decoding method; each has a config in conf/decode/method/."""
