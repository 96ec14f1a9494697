"""Model families of optimum-vim."""
