"""INT8 variants of an export: how they are made and when they are good enough.

Modules: ``quantize`` (ORT dynamic quantization of the weight MatMuls), ``tuning`` (which MatMuls stay
fp32, per-channel or per-tensor scales, the retunes), ``gate`` (when INT8 is good enough: the paired
bound vs its fp32 graph), ``smoothing`` (SmoothQuant-style activation smoothing, ``--int8-smooth``).
Nothing is imported here: the export stage (:mod:`cahp_deploy.export.stage`) imports what it uses.
"""
