"""The engine: the generator interface, its transformers implementation, hooks, the planner, weight formats
and kernels. No AWS or HTTP types: the API layer (`phi2.api`) and the Lambda runtime (`phi2.runtime`) use it."""
