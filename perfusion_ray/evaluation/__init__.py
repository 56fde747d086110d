"""Evaluation against FashionWorld ground truth: reward models now, aligned policies next."""
