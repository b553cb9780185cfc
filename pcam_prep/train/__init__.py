"""The bundled PyTorch trainer and predictor: config, data (torch side), models, augment, loop, predict.

Submodules import torch; this package itself does not, so `pcam_prep.train.config` stays light for the CLI.
"""
