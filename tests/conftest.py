import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("GLM4V_MS_DEVICE", "cpu")
os.environ.setdefault("GLOG_v", "3")   # MindSpore: errors only
