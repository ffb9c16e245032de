package ferry

import java.io.File

import scala.sys.process._

import ferry.examples.ConvolveDemo
import org.apache.spark.sql.Row
import org.apache.spark.sql.types._
import org.scalatest.funsuite.AnyFunSuite

class ConvolveDemoSuite extends AnyFunSuite with SparkSuite {

  test("argument parsing: positional kernel file and mode, or inline kernel") {
    val a = ConvolveDemo.parse(Seq("in", "out", "k.npy", "full"))
    assert(a.input == "in" && a.output == "out" && a.kernelFile.contains("k.npy") && a.mode == "full")
    val b = ConvolveDemo.parse(Seq("in", "out", "--kernel-real", "1,2", "--kernel-imag", "0,1", "--imag-col", ""))
    assert(b.kernelReal.get.toSeq == Seq(1.0, 2.0) && b.kernelImag.get.toSeq == Seq(0.0, 1.0) && b.imagCol == "")
    assert(b.repeat == 1 && ConvolveDemo.parse(Seq("in", "out", "k.npy", "--repeat", "3")).repeat == 3)
    intercept[IllegalArgumentException](ConvolveDemo.parse(Seq("in", "out", "k.npy", "--repeat", "0")))
    intercept[IllegalArgumentException](ConvolveDemo.parse(Seq("in", "out")))
    intercept[IllegalArgumentException](ConvolveDemo.parse(Seq("in")))
  }

  test("reads a numpy .npy kernel, convolves a Parquet series and writes Parquet") {
    val dir = TestSpark.newDir("demo")
    val kernel = new File(dir, "k.npy")
    val text = new File(dir, "k.txt")
    val script = s"import numpy as np; np.save(r'${kernel.getAbsolutePath}', np.array([0.5+1j, -0.25, 2-0.5j]))"
    assert(Seq(TestSpark.python, "-c", script).! == 0)
    val (kr, ki) = ConvolveDemo.readKernel(kernel.getAbsolutePath)
    assert(kr.toSeq == Seq(0.5, -0.25, 2.0) && ki.toSeq == Seq(1.0, 0.0, -0.5))
    java.nio.file.Files.write(text.toPath, "# taps\n0.5 1\n-0.25,0\n2 -0.5\n".getBytes)
    val (tr, ti) = ConvolveDemo.readKernel(text.getAbsolutePath)
    assert(tr.toSeq == kr.toSeq && ti.toSeq == ki.toSeq)

    val n = 2000
    val re = Array.tabulate(n)(i => math.sin(i * 0.01))
    val im = Array.tabulate(n)(i => math.cos(i * 0.03))
    val schema = StructType(Seq(StructField("id", LongType), StructField("real", DoubleType),
      StructField("imag", DoubleType)))
    val input = new File(dir, "in.parquet").getAbsolutePath
    val output = new File(dir, "out.parquet").getAbsolutePath
    spark.createDataFrame(spark.sparkContext.parallelize(re.indices.map(i => Row(i.toLong, re(i), im(i))), 3), schema)
      .write.parquet(input)
    val result = ConvolveDemo.run(spark, ConvolveDemo.parse(Seq(input, output, kernel.getAbsolutePath, "same")))
    assert(result.samples == n && result.outputs == n && result.taps == 3)
    assert(result.line.startsWith("""FERRY_DEMO_RESULT {"path":"scala","seconds":"""))
    assert(Json.decodeObject(result.line.stripPrefix("FERRY_DEMO_RESULT ")).get("samples") == n)
    val (er, ei) = ConvolveSuite.reference(re, im, kr, ki, "same")
    spark.read.parquet(output).collect().foreach { r =>
      val o = r.getLong(0).toInt
      assert(math.abs(r.getDouble(1) - er(o)) < 1e-9 && math.abs(r.getDouble(2) - ei(o)) < 1e-9)
    }
  }
}
