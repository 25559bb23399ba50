from bmojo.modeling_bmojo import BMojoForCausalLM, BMojoModel  # noqa: F401
