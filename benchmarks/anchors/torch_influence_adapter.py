AVAILABLE = False

def methods():
    return []
