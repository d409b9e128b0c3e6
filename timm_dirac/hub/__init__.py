""" The Hugging Face Hub side: model cards (`card`), Hub folders (`folder`), the `convert` and `push` commands. """
