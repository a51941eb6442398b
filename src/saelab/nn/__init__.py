"""The networks (autoencoders, StackedNet), the Lightning modules and callbacks that train one
stage, and the fast step loop."""
