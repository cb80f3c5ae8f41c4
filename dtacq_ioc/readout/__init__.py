"""What happens to samples, in order: integrity -> display -> trigger -> run -> .dig files."""
