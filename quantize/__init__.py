"""Model compression: tfmot pruning, QAT and pruning-preserving QAT, post-training quantization, TFLite export.

Entry point: ``python -m quantize --model NAME --recipe RECIPE``. Importing this
package imports nothing heavy; TensorFlow is loaded by the modules that need it.
"""
