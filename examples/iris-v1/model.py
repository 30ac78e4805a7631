"""Iris classifier, version 1.

The control plane imports this file once per replica, then calls ``predict(body)``
for each request with the request's JSON body; the return value must be JSON too.
Training happens at import: the iris data set ships with scikit-learn.
"""

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

iris = load_iris()
classifier = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
class_names = [str(name) for name in iris.target_names]


def predict(body: dict) -> dict:
    """{"features": [[5.1, 3.5, 1.4, 0.2], ...]} -> {"classes": ["setosa", ...], "version": 1}"""
    predicted = classifier.predict(body["features"])
    return {"classes": [class_names[i] for i in predicted], "version": 1}
