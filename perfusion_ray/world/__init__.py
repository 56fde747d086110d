"""FashionWorld: real Fashion-MNIST items, colourised into a catalogue, merchants with hidden tastes,
a pixel oracle and a feedback simulator. The embedded default and the measuring stick."""
