"""Retraining napari-retina's models from IDRiD-layout and annotation project folders.

Run as `python -m training <model> ...`. Imports only torch, NumPy, SciPy,
scikit-image, scikit-learn, OpenCV, Pillow, tifffile and safetensors (plus
napari_retina's headless core), so it runs on a GPU machine from a checkout.
"""
