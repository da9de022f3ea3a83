"""The demos (shapes world, tiny random-weight model), the shapes world and its oracle, and test stand-ins."""
