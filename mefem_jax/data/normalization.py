"""The pixel statistics every encoder here expects: ImageNet mean and std, per RGB channel.

MeFEm's released weights, timm's ViTs and our exports all take images scaled to [0, 1] and then
normalised with these numbers, so they are defined once: the input pipeline applies them, and the
exporter writes them into the timm `config.json` and model card.
"""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
