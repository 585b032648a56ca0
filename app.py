from diffmix_core.ui import build_demo

demo = build_demo()
if __name__ == "__main__":
    demo.launch()
