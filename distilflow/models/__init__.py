"""Models: built-in zoo, builders, feature taps and projection heads."""
