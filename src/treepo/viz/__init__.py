"""Pictures: trees as HTML and PNG (`render`) and in the terminal (`terminal`); training and benchmark plots (`plots`)."""
