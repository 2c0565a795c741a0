"""What a node reports about itself to the controller (run there by `apull status`)."""
