"""Kubeflow Pipelines components that run cloudhpc jobs, and the example ML pipelines.

`runner.run_job` runs any job to its end through porter (no Kubeflow needed); `components` wraps it
and the example's steps as KFP v2 components (imports kfp); `fmnist` is the example;
`compile` writes `deploy/pipelines/*.yaml`; `mlflow_server` runs a local MLflow for the demo.
See docs/pipelines.md.
"""
