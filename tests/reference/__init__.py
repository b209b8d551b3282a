"""Independent references of each method, written from the papers and their reference code's semantics.

Nothing here imports the project's math, graph or twin modules (``passes.<method>.eager``, ``.graph``,
``.twin``): the references use torch alone and are applied to the diffusers
modules by their own hooks, so a graph that equals them shows the paper's math, not the surgery.
Where the runtime draws a random choice (ToMe's dst per cell), the reference takes the same choice as
an argument. Sorting ties may break differently between implementations; the tests feed random
activations, which have none.
"""
