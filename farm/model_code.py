"""The python_function model physfarm logs, as MLflow's "models from code" loads it (this file is
saved with every model; nothing is pickled). The model itself is `farm.models.PhysfarmModel`."""
import mlflow

from farm.models import PhysfarmModel


class PhysfarmPythonModel(PhysfarmModel, mlflow.pyfunc.PythonModel):
    pass


mlflow.models.set_model(PhysfarmPythonModel())
