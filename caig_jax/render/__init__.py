"""Background renderer: SD-1.5 + ControlNet(canny) inpainting around an untouched product cut-out."""
