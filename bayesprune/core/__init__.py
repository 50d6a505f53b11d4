"""The core: model families and sizes, configs and targets, the gates, the Pyro model with its
likelihood, the guide, the fit and the posterior that plans any size."""
