def save(model, path): raise NotImplementedError
def load(path, model=None): raise NotImplementedError
