"""Text: tokenizers, noise functions and classic preprocessing."""
