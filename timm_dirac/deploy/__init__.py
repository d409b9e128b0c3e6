""" Deployment: ONNX export, the int8 flows with their Dirac taps, quantization-aware training, inference backends
and the speed benchmark. """
