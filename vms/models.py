"""VM read models (projections of vm.* events) arrive with the lifecycle work (issue 4)."""
