"""Post-hoc calibrators: temperature, vector/matrix/Dirichlet scaling, ensemble temperature,
histogram binning and isotonic regression, and the automatic choice among them."""
