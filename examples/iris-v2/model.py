"""Iris classifier, version 2: a renamed entry function and richer answers.

Build it with ``--function classify``. Each answer now carries the probability
of every class next to the predicted one.
"""

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

iris = load_iris()
classifier = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
class_names = [str(name) for name in iris.target_names]


def classify(body: dict) -> dict:
    """{"features": [[5.1, 3.5, 1.4, 0.2], ...]} -> classes, probabilities, "version": 2"""
    features = body["features"]
    predicted = classifier.predict(features)
    probabilities = classifier.predict_proba(features)
    return {
        "classes": [class_names[i] for i in predicted],
        "probabilities": [
            {name: round(float(p), 4) for name, p in zip(class_names, row, strict=True)}
            for row in probabilities
        ],
        "version": 2,
    }
