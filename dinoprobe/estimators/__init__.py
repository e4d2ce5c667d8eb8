"""scikit-learn estimators over feature arrays: `Probe`, `Sweep`, `LogReg`, `KNN`."""
