"""HTTP services that read what was published: the model server and the training API."""
