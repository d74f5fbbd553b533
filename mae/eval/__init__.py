"""How good an encoder is: encoder sources, linear probe and kNN, fine-tuning, the uses judged
against PCA, metrics and reports."""
