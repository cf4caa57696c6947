"""What a configuration compiles into: the route table, the header policies and
the discovered model ids, built once and swapped whole on reload.
"""
