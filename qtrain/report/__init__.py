"""Tables and figures redrawn from run folders; never imported by training."""
