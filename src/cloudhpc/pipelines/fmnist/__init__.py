"""The example: a CNN on Fashion-MNIST (or, offline, scikit-learn's digits), trained with Ray Train.

`data` (fetch, split, store), `train` (the training script a job runs; no cloudhpc import),
`evaluate` (held-out test metrics, the gate, registration), `steps` (each pipeline step as a
function) and `pipeline` (the two KFP pipelines; imports kfp).
"""
