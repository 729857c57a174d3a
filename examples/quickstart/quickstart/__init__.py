"""Quickstart: a standard Flower app that runs flwr-kd's FedDF."""
