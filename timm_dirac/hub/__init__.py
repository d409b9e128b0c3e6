""" The Hugging Face Hub side: Hub folders and model cards, checkpoint conversion, upload. """
