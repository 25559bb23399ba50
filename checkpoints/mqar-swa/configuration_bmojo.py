from bmojo.configuration_bmojo import BMojoConfig  # noqa: F401
