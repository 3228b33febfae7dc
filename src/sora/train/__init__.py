"""Training: the loop (objective-agnostic), distributed setup and the recipes that assemble them."""
