"""Output writers: one module per format (WebDataset tars, Zarr/HDF5 arrays, torchvision files)."""
